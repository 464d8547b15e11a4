"""Pseudo-queries from the collection itself: the domain, learned from the items' own text.

Clicks teach the query tower what users who clicked meant; on their own they fit the clicked
queries and barely move the others (measured: Cranfield train nDCG@10 +0.085, test -0.005). The
corpus says what the domain's language is about to every query: a sentence of an item's text,
read as a query, should find that item among all others. This is the inverse cloze task of Lee et
al. ("Latent Retrieval for Weakly Supervised Open Domain Question Answering", ACL 2019), here with
the sentence kept in the item (the item tower is frozen and its vectors cached, so the target is
the stored vector) and mixed into every batch at `train.corpus_share` beside the click examples.

An item's first sentence (its title where the item has one: BEIR items are stored as "title. text")
and other sentences are both used, since users' queries look like either: a short topic or a claim.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass
class CorpusQueries:
    texts: list[str]
    items: list[str]        # the object id each pseudo-query came from

    def __len__(self) -> int:
        return len(self.texts)


def sentences(text: str, min_words: int = 4, max_words: int = 40) -> list[str]:
    """The text's sentences of a query-like length, in order."""
    out = []
    for sentence in _SENTENCE_END.split(text or ""):
        words = sentence.split()
        if min_words <= len(words) <= max_words:
            out.append(" ".join(words))
    return out


def corpus_queries(texts: dict[str, str], per_item: int = 2, seed: int = 7) -> CorpusQueries:
    """Up to `per_item` pseudo-queries per item: its first sentence, then random others."""
    rng = random.Random(seed)
    out_texts, out_items = [], []
    for object_id in sorted(texts):
        found = sentences(texts[object_id])
        if not found:
            continue
        chosen = [found[0]] + rng.sample(found[1:], min(len(found) - 1, per_item - 1))
        for sentence in chosen[:per_item]:
            out_texts.append(sentence)
            out_items.append(object_id)
    return CorpusQueries(out_texts, out_items)
