"""Near-duplicate texts: MinHash (datasketch) finds the candidates, exact Jaccard similarity decides.

A text is compared as the set of its word 3-grams ("shingles") after case folding, so spacing,
punctuation and case do not matter and a reworded sentence shares only part of its shingles.
MinHash LSH keeps the search near-linear; each candidate pair is then measured exactly, so a reported
similarity is a property of the two texts, not of the hash seed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

SHINGLE_WORDS = 3
NUM_PERM = 128
SEED = 1  # fixed: the same data gives the same candidates on every machine
_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


def shingles(text: str) -> frozenset[str]:
    """Word 3-grams; a text shorter than that is one shingle of all its words."""
    tokens = words(text)
    if len(tokens) <= SHINGLE_WORDS:
        return frozenset([" ".join(tokens)]) if tokens else frozenset()
    return frozenset(" ".join(tokens[i : i + SHINGLE_WORDS]) for i in range(len(tokens) - SHINGLE_WORDS + 1))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


def word_line(text: str) -> str:
    """The text's words, space-separated and padded: "a text's words appear, in order and adjacent, in
    another's" (a prompt pasted into a longer message) is then a substring test."""
    return f" {' '.join(words(text))} "


@dataclass(frozen=True)
class Pair:
    first: int  # index into the first list
    second: int  # index into the second list (or the same list)
    similarity: float


def _minhash(items: frozenset[str]):
    from datasketch import MinHash

    minhash = MinHash(num_perm=NUM_PERM, seed=SEED)
    minhash.update_batch(item.encode("utf-8") for item in sorted(items))
    return minhash


def similar_pairs(texts: Sequence[str], others: Sequence[str] | None, threshold: float) -> list[Pair]:
    """Pairs with Jaccard similarity >= threshold: within `texts` (first < second) when `others` is None,
    else between `texts` (first) and `others` (second). Sorted by (first, second)."""
    from datasketch import MinHashLSH

    left = [shingles(text) for text in texts]
    right = left if others is None else [shingles(text) for text in others]
    # LSH is tuned a little below the threshold so that pairs near it are not lost to banding.
    lsh = MinHashLSH(threshold=max(0.05, threshold - 0.2), num_perm=NUM_PERM)
    for index, items in enumerate(right):
        if items:
            lsh.insert(index, _minhash(items))
    pairs = []
    for index, items in enumerate(left):
        if not items:
            continue
        for other in sorted(lsh.query(_minhash(items))):
            if others is None and other <= index:
                continue
            similarity = jaccard(items, right[other])
            if similarity >= threshold:
                pairs.append(Pair(index, other, round(similarity, 3)))
    return sorted(pairs, key=lambda pair: (pair.first, pair.second))
