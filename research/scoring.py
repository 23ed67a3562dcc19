"""Scoring the benchmark's models on the hospitals' held-out splits: completion loss, perplexity and
multiple-choice accuracy, per round, per hospital and across hospitals (the cross-client matrix)."""
from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

from fednode.learning.data import ClientData
from fednode.learning.training import AdapterTrainer

SHARED = "global"  # the model key of a method whose hospitals all use one model
MC_SCORING = ("the option whose ' option' + eos has the highest mean per-token log-likelihood after the prompt "
              "(length-normalised); mc_acc_total picks by the summed log-likelihood instead")
State = dict


class BenchmarkError(ValueError):
    """A benchmark configuration that cannot be run."""




class Model(NamedTuple):
    """One hospital's model: the trainer that runs it, its adapter and (personalized rules) its private adapter."""

    trainer: AdapterTrainer
    state: State
    local: State | None = None


Checkpoints = list[dict[str, Model]]  # per round from 0: the model per hospital name, or {SHARED: one for all}


class Choice(NamedTuple):
    prompt: str
    completion: str


class SplitScorer:
    """Scores models on the hospitals' held-out splits: completion loss, perplexity, multiple-choice accuracy."""

    def __init__(self, questions: Mapping[str, list[tuple[str, list[str], int]]], batch_size: int,
                 max_length: int):
        self.questions = questions
        self.batch_size = batch_size
        self.max_length = max_length

    def __call__(self, model: Model, client: ClientData) -> dict:
        loss = model.trainer.evaluate(client.eval, model.state, self.batch_size, self.max_length,
                                      local_state=model.local)
        return {"loss": loss["loss"], "perplexity": loss["perplexity"],
                **multiple_choice_accuracy(model, self.questions[client.name], self.batch_size, self.max_length)}


def multiple_choice_accuracy(model: Model, questions: Sequence[tuple[str, list[str], int]], batch_size: int = 16,
                             max_length: int = 64) -> dict:
    """Accuracy over `(prompt, options, answer_idx)` questions, every option scored in one batched pass:
    `mc_acc` picks by mean per-token log-likelihood (length-normalised), `mc_acc_total` by the sum."""
    if not questions:
        raise BenchmarkError("no multiple-choice questions to score")
    flat = [Choice(prompt, option) for prompt, options, _ in questions for option in options]
    scores = iter(model.trainer.score(flat, model.state, batch_size, max_length, local_state=model.local))
    normalised = total = 0
    for _, options, answer in questions:
        option_scores = [next(scores) for _ in options]
        normalised += _argmax([ll / n for ll, n in option_scores]) == answer
        total += _argmax([ll for ll, _ in option_scores]) == answer
    return {"mc_acc": normalised / len(questions), "mc_acc_total": total / len(questions),
            "mc_items": len(questions)}


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # ties go to the first option




def score_checkpoints(score: SplitScorer, clients: Sequence[ClientData], checkpoints: Checkpoints) -> dict:
    """Per-hospital own-split curves (from round 0), per-round summaries, and the final cross-client matrix:
    `hospitals[h]['cross'][g]` scores h's model (the shared one if any) on g's split."""
    curves: dict[str, list[dict]] = {c.name: [] for c in clients}
    matrix: dict[str, dict[str, dict]] = {}
    for r, models in enumerate(checkpoints):
        model_on = _memo_scorer(score, models)
        for c in clients:
            curves[c.name].append({"round": r, **model_on(c, c)})
        if r == len(checkpoints) - 1:
            matrix = {c.name: {g.name: model_on(c, g) for g in clients} for c in clients}
    hospitals = {}
    for c in clients:
        cross = {g: m for g, m in matrix[c.name].items() if g != c.name}
        hospitals[c.name] = {"own": matrix[c.name][c.name], "curve": curves[c.name], "cross": cross,
                             "cross_mean": _mean_metrics(cross.values()) if cross else None}
    rounds = [summarize_round({c.name: curves[c.name][r] for c in clients}) | {"round": r}
              for r in range(len(checkpoints))]
    off_diagonal = [m for h in hospitals.values() for m in h["cross"].values()]
    return {"hospitals": hospitals, "rounds": rounds,
            "final": {**rounds[-1], "cross": _mean_metrics(off_diagonal) if off_diagonal else None}}


def _memo_scorer(score: SplitScorer, models: Mapping[str, Model]) -> Callable[[ClientData, ClientData], dict]:
    """`model_on(owner, split)`: the owner's model (the shared one if any) scored on `split`, each pair once."""
    scored: dict[tuple[str, str], dict] = {}

    def model_on(owner: ClientData, split: ClientData) -> dict:
        key = (owner.name if owner.name in models else SHARED, split.name)
        if key not in scored:
            scored[key] = score(models[key[0]], split)
        return scored[key]

    return model_on


def _mean_metrics(metrics: Iterable[Mapping]) -> dict:
    metrics = list(metrics)
    return {k: statistics.fmean(m[k] for m in metrics) for k in ("loss", "mc_acc")}


def summarize_round(own: Mapping[str, Mapping]) -> dict:
    """Mean, worst, best and best-worst gap over hospitals of own-split loss and multiple-choice accuracy."""
    worst_loss = max(own, key=lambda h: own[h]["loss"])
    best_loss = min(own, key=lambda h: own[h]["loss"])
    worst_acc = min(own, key=lambda h: own[h]["mc_acc"])
    best_acc = max(own, key=lambda h: own[h]["mc_acc"])
    mean_loss = statistics.fmean(m["loss"] for m in own.values())
    return {
        "mean_loss": mean_loss, "mean_perplexity": math.exp(mean_loss),
        "worst_loss": own[worst_loss]["loss"], "worst_loss_client": worst_loss,
        "worst_perplexity": own[worst_loss]["perplexity"],
        "loss_gap": own[worst_loss]["loss"] - own[best_loss]["loss"],
        "mean_acc": statistics.fmean(m["mc_acc"] for m in own.values()),
        "worst_acc": own[worst_acc]["mc_acc"], "worst_acc_client": worst_acc,
        "acc_gap": own[best_acc]["mc_acc"] - own[worst_acc]["mc_acc"],
    }
