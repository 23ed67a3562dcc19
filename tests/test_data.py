import os
import re
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest

with warnings.catch_warnings():  # the library uses deprecated importlib.resources calls
    warnings.simplefilter("ignore", DeprecationWarning)
    import simple_icd_10_cm as icd

from fednode.learning.data import (
    MAX_REVIEW_CHARS,
    MIN_ITEMS_PER_CLIENT,
    DataConfig,
    DataError,
    build_clients,
    corpus_texts,
    describe_clients,
    load_examples,
)
from research.multiple_choice import multiple_choice_items

SMALL = dict(train_per_client=64, eval_per_client=16)
ALL_SETUPS = [(s, p) for s in ("icd10", "drugs", "mixed") for p in ("natural", "dirichlet")]


def _keys(examples):
    return {(ex.source, ex.key) for ex in examples}


def _labels(client):
    return {ex.label for ex in client.train + client.eval}


def _skew(clients):
    """Mean total-variation distance between each client's train label mix and the pooled mix."""
    pooled = Counter()
    for c in clients:
        pooled.update(c.label_counts())
    total = sum(pooled.values())
    return sum(
        sum(abs(c.label_counts().get(label, 0) / len(c.train) - n / total) for label, n in pooled.items()) / 2
        for c in clients
    ) / len(clients)


def test_same_seed_same_clients_and_different_seed_differs():
    cfg = DataConfig(source="mixed", partition="dirichlet", **SMALL)
    assert build_clients(cfg) == build_clients(cfg)
    other = build_clients(DataConfig(source="mixed", partition="dirichlet", seed=1, **SMALL))
    assert [c.train for c in other] != [c.train for c in build_clients(cfg)]


_DIGEST = (
    "import hashlib; from fednode.learning.data import *; from research.multiple_choice import multiple_choice_items; "
    "cfg = DataConfig(source='drugs', partition='dirichlet', alpha=0.5); "
    "cs = build_clients(cfg); blob = repr([(c.train, c.eval) for c in cs]) + repr(corpus_texts(cfg, 500)) "
    "+ repr([multiple_choice_items(c) for c in cs]); print(hashlib.sha256(blob.encode()).hexdigest())"
)


def test_bit_identical_across_processes_with_different_hash_seeds():
    root = Path(__file__).resolve().parents[1]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _DIGEST],
            cwd=root,
            env={**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(root)},
            stdout=subprocess.PIPE,
            text=True,
        )
        for hash_seed in ("1", "2")
    ]
    digests = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert digests[0] == digests[1] and len(digests[0]) == 64


@pytest.mark.parametrize("source,partition", ALL_SETUPS)
def test_eval_keys_never_overlap_training_and_clients_are_non_empty(source, partition):
    clients = build_clients(DataConfig(source=source, partition=partition, num_clients=4, **SMALL))
    train_keys = set().union(*(_keys(c.train) for c in clients))
    eval_keys = [_keys(c.eval) for c in clients]
    for i, keys in enumerate(eval_keys):
        assert not keys & train_keys
        assert all(not keys & other for other in eval_keys[i + 1 :])
    assert all(c.train and c.eval for c in clients)
    assert all(len(c.train) <= 64 and len(c.eval) <= 16 for c in clients)


def test_mixed_clients_hold_both_sources():
    for client in build_clients(DataConfig(source="mixed", **SMALL)):
        assert {ex.source for ex in client.train} == {ex.source for ex in client.eval} == {"icd10", "drugs"}


@pytest.mark.parametrize("source", ["icd10", "drugs", "mixed"])
def test_natural_partition_gives_disjoint_label_sets(source):
    clients = build_clients(DataConfig(source=source, partition="natural", num_clients=3, **SMALL))
    label_sets = [_labels(c) for c in clients]
    for i, labels in enumerate(label_sets):
        assert labels
        assert all(not labels & other for other in label_sets[i + 1 :])


def test_natural_partition_uses_every_chapter_once_with_one_client_per_chapter():
    clients = build_clients(DataConfig(num_clients=22, **SMALL))
    assert [sorted(_labels(c)) for c in clients] == [[f"ch{i:02d}"] for i in range(1, 23)]


@pytest.mark.parametrize("source", ["icd10", "drugs", "mixed"])
def test_small_alpha_is_more_skewed_than_large_alpha(source):
    def skew(**kwargs):
        return _skew(build_clients(DataConfig(source=source, **kwargs)))

    assert skew(partition="dirichlet", alpha=0.1) > skew(partition="dirichlet", alpha=100.0) + 0.2
    assert skew(partition="natural") > 0.6  # disjoint labels: 1 - 1/3 for equal-sized clients


def test_tiny_alpha_still_fills_every_client():
    clients = build_clients(DataConfig(source="drugs", partition="dirichlet", alpha=0.001, num_clients=10))
    assert all(len(_keys(c.train)) + len(_keys(c.eval)) >= MIN_ITEMS_PER_CLIENT and c.eval for c in clients)


def test_both_directions_of_a_code_share_a_key():
    by_key = {}
    for ex in load_examples("icd10")[:3000]:
        by_key.setdefault(ex.key, []).append(ex)
    for key, examples in by_key.items():
        assert examples[0].text == f"ICD-10-CM code {key} means: {icd.get_description(key)}"
        assert examples[1].text == f"ICD-10-CM code for: {icd.get_description(key)}\nCode: {key}"
        assert len({ex.label for ex in examples}) == 1


def test_drug_reviews_are_unescaped_and_truncated():
    examples = load_examples("drugs")
    texts = [ex.text for ex in examples]
    assert not any(re.search(r"&(#\d+|[a-z]+);", t) for t in texts)
    assert any("'" in t for t in texts)  # the raw data spells these "&#039;"
    reviews = [ex.completion for ex in examples if ex.prompt.startswith("Patient review")]
    assert all(len(r) <= MAX_REVIEW_CHARS + 5 for r in reviews)
    assert any(r.endswith(" ...") for r in reviews)
    assert "Bipolar Disorder" in {ex.label for ex in examples}  # truncated "Disorde" repaired


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(source="pubmed"), "source"),
        (dict(partition="iid"), "partition"),
        (dict(alpha=0.0), "alpha"),
        (dict(alpha=float("nan")), "alpha"),
        (dict(num_clients=0), "num_clients"),
        (dict(train_per_client=0), "train_per_client"),
        (dict(eval_per_client=-1), "eval_per_client"),
    ],
)
def test_bad_config_raises_naming_the_field(kwargs, field):
    with pytest.raises(DataError, match=f"^{field} ") as err:
        DataConfig(**kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("source,too_many", [("icd10", 23), ("drugs", 41), ("mixed", 23)])
def test_more_clients_than_labels_is_rejected(source, too_many):
    with pytest.raises(DataError, match="^num_clients must be between 1 and"):
        build_clients(DataConfig(source=source, num_clients=too_many))


def test_bad_arguments_raise():
    client = build_clients(DataConfig(source="drugs", **SMALL))[0]
    with pytest.raises(DataError, match="^limit "):
        corpus_texts(DataConfig(), 0)
    with pytest.raises(DataError, match="^n_options "):
        multiple_choice_items(client, n_options=1)
    with pytest.raises(DataError, match="^n_options "):
        multiple_choice_items(client, n_options=100)


def test_corpus_excludes_every_eval_example():
    cfg = DataConfig(source="mixed", num_clients=3)
    eval_texts = {ex.text for c in build_clients(cfg) for ex in c.eval}
    corpus = corpus_texts(cfg, 50_000)
    assert len(corpus) == 50_000 and not eval_texts & set(corpus)
    assert corpus_texts(cfg, 100) == corpus[:100]


def test_multiple_choice_icd10_answer_is_the_codes_description():
    client = build_clients(DataConfig(**SMALL))[1]
    items = multiple_choice_items(client, seed=3)
    assert len(items) == len(_keys(client.eval))
    chapters = {}  # description -> chapters using it
    for ex in load_examples("icd10"):
        if ex.prompt.endswith(" means:"):
            chapters.setdefault(ex.completion, set()).add(ex.label)
    for prompt, options, answer in items:
        code = re.fullmatch(r"ICD-10-CM code (\S+) means:", prompt).group(1)
        assert options[answer] == " " + icd.get_description(code)
        assert len(options) == len(set(options)) == 4
        assert set.intersection(*(chapters[o] for o in options))  # distractors from the same chapter
    assert len({answer for _, _, answer in items}) > 1
    assert multiple_choice_items(client, seed=3) == items


def test_multiple_choice_drugs_picks_the_reviews_condition():
    client = build_clients(DataConfig(source="drugs", **SMALL))[2]
    asked = {ex.prompt: ex.completion for ex in client.eval if ex.prompt.startswith("Drug review:")}
    items = multiple_choice_items(client, n_options=5)
    assert items and all(prompt in asked for prompt, _, _ in items)
    for prompt, options, answer in items:
        assert options[answer] == asked[prompt]
        assert len(options) == len(set(options)) == 5


def test_describe_clients_lists_every_client():
    clients = build_clients(DataConfig(source="drugs", **SMALL))
    table = describe_clients(clients).splitlines()
    assert len(table) == 4 and table[1].startswith("hospital-0") and "%" in table[1]
