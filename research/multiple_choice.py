"""Multiple-choice questions from the hospitals' held-out entries, for the quality benchmark: the right answer of an
entry among distractors of the same label, scored by log-likelihood."""
from __future__ import annotations

import random
from functools import lru_cache

from fednode.learning.data import ClientData, DataError, Item, label_groups, source_items


@lru_cache(maxsize=None)
def _answers(source: str) -> tuple[dict[str, tuple[str, ...]], tuple[str, ...]]:
    """Distinct multiple-choice answers per label, and over the whole source."""
    per_label = {
        label: tuple(dict.fromkeys(item.examples[0].completion for item in items))
        for label, items in label_groups(source).items()
    }
    return per_label, tuple(dict.fromkeys(a for answers in per_label.values() for a in answers))


@lru_cache(maxsize=None)
def _item_index(source: str) -> dict[str, Item]:
    return {item.key: item for item in source_items(source)}


def multiple_choice_items(client: ClientData, n_options: int = 4, seed: int = 0) -> list[tuple[str, list[str], int]]:
    """One question per eval key: ``(prompt, options, answer_idx)``; ``prompt + option`` is a training-style text.

    ICD-10: "ICD-10-CM code X means:" with the right description among distractors from the same chapter.
    Drugs: "Drug review: ...\\nCondition:" with the right condition among other conditions. Distractors come
    from the whole source when the label has too few distinct answers (always so for drug conditions).
    """
    if n_options < 2:
        raise DataError(f"n_options must be >= 2; got {n_options!r}")
    rng = random.Random(f"{seed}/choices/{client.name}")
    out = []
    for source, key in dict.fromkeys((ex.source, ex.key) for ex in client.eval):
        question = _item_index(source)[key].examples[0]
        per_label, everything = _answers(source)
        pool = [a for a in per_label[question.label] if a != question.completion]
        if len(pool) < n_options - 1:
            pool = [a for a in everything if a != question.completion]
        if len(pool) < n_options - 1:
            raise DataError(f"n_options must be <= {len(pool) + 1} for source {source!r}; got {n_options}")
        options = [question.completion, *rng.sample(pool, n_options - 1)]
        rng.shuffle(options)
        out.append((question.prompt, options, options.index(question.completion)))
    return out
